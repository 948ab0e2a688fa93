import { Tensor } from '../lib/index';
import { native } from '../lib/native';
const [M, n, k] = (process.argv[2] ?? '1024,1024,1024').split(',').map(Number);
const x = Tensor.randn([M, k], { seed: 1 }), w = Tensor.randn([1, n, k], { seed: 2 }), y = Tensor.zeros([M, n]);
const off = Tensor.from([0, M], [2], { dtype: 'i32' });
let b = 1e9;
for (let i = 0; i < 7; i++) { const t0 = performance.now(); native.groupedGemmForward(x.storage, w.storage, off.storage, y.storage, 0, M, n, k, 1); b = Math.min(b, performance.now() - t0); }
console.log('native fwd GFLOP/s', (2 * M * n * k / 1e6 / b).toFixed(1));
