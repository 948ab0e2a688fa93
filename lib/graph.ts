/**
 * CUDA graphs (cuda/runtime.cu): the ops a function enqueues, captured once and replayed with one
 * launch. Nothing runs during the capture; a replay runs the captured kernels and copies with the
 * arguments they had then (the same buffers: values that change from replay to replay are read from
 * device memory, e.g. written there by an upload before the launch). Inside a capture, anything that
 * waits for the device fails the capture with XFT_CUDA: a read back (toArray, item), a
 * synchronisation, an upload through the staging buffers, an allocation (make the buffers first).
 * The CPU backend has no graphs: capture throws XFT_DEVICE.
 */
import { XftError } from './errors';
import { native } from './native';

interface GraphNative {
  graphBegin(): void;
  graphEnd(): number;
  graphLaunch(handle: number): void;
  graphDestroy(handle: number): void;
}

const graphNative = native as unknown as GraphNative;

export class CudaGraph {
  #handle: number;

  private constructor(handle: number) {
    this.#handle = handle;
  }

  /** Captures the CUDA ops `fn` enqueues (they do not run now). If fn throws, the capture is dropped and the error rethrown. */
  static capture(fn: () => void): CudaGraph {
    if (typeof fn !== 'function') throw new XftError(`CudaGraph.capture: expected a function but received ${typeof fn}`, 'XFT_TYPE');
    graphNative.graphBegin();
    try {
      fn();
    } catch (err) {
      try {
        graphNative.graphDestroy(graphNative.graphEnd());
      } catch {
        // the capture was invalidated by the failure: nothing to keep
      }
      throw err;
    }
    return new CudaGraph(graphNative.graphEnd());
  }

  /** Enqueues one replay of the captured work. */
  launch(): void {
    if (this.#handle === 0) throw new XftError('CudaGraph.launch: the graph was disposed', 'XFT_DISPOSED');
    graphNative.graphLaunch(this.#handle);
  }

  dispose(): void {
    if (this.#handle !== 0) graphNative.graphDestroy(this.#handle);
    this.#handle = 0;
  }
}
