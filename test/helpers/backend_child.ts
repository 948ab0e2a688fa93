// Child of test/15.backend.ts: the backend as this process's environment (the emulator's XFT_EMU_* host)
// makes it, and what asking for a CUDA tensor then does, as one JSON line.
import { Tensor, backend } from '../../lib/index';

const b = backend();
let error: { name: string; code?: string; message: string } | null = null;
try {
  Tensor.zeros([1], { device: 'cuda' }).dispose();
} catch (e) {
  const err = e as Error & { code?: string };
  error = { name: err.constructor.name, code: err.code, message: err.message };
}
console.log(JSON.stringify({ backend: b, error }));
