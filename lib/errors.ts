/** Error codes of every error xft throws. */
export type XftErrorCode =
  | 'XFT_SHAPE' // a tensor has the wrong shape, or sizes do not fit together
  | 'XFT_DTYPE' // a tensor has the wrong dtype
  | 'XFT_DEVICE' // a tensor is on the wrong device, or the device is not available
  | 'XFT_DISPOSED' // a tensor was used after dispose()
  | 'XFT_VALUE' // an argument has an invalid value
  | 'XFT_INDEX' // an index tensor holds an entry outside its range (found by the native layer or a GPU kernel)
  | 'XFT_TYPE' // an argument has the wrong type
  | 'XFT_OOM' // out of memory
  | 'XFT_CUDA' // a CUDA call or kernel failed
  | 'XFT_IO' // a file could not be read or written
  | 'XFT_FORMAT' // a file or record is malformed
  | 'XFT_NONFINITE' // a loss, gradient or tensor to be written is NaN or infinite (training diverged)
  | 'XFT_BUSY' // another writer holds the output folder (or another run trains the model)
  | 'XFT_DIST' // a distributed run failed: a peer rank died, hung or could not be reached, or a collective failed
  | 'XFT_NATIVE'; // the native addon could not be loaded

/** The one error class of xft: `code` says what went wrong, the message names the argument. */
export class XftError extends Error {
  readonly code: XftErrorCode;
  constructor(message: string, code: XftErrorCode) {
    super(message);
    this.name = 'XftError';
    this.code = code;
  }
}

/** `Expected <what> for <name> but received <value>`, in the style of sharp's invalidParameterError. */
export function invalidArgument(op: string, name: string, expected: string, received: unknown, code: XftErrorCode = 'XFT_VALUE'): XftError {
  return new XftError(`${op}: expected ${expected} for ${name} but received ${describe(received)}`, code);
}

export function describe(value: unknown): string {
  if (value === null) return 'null';
  if (value === undefined) return 'undefined';
  if (typeof value === 'number' || typeof value === 'boolean' || typeof value === 'bigint') return String(value);
  if (typeof value === 'string') return JSON.stringify(value.length > 40 ? value.slice(0, 40) + '…' : value);
  if (Array.isArray(value))
    return value.length <= 8 && value.every((v) => typeof v !== 'object') ? `[${value.map((v) => describe(v)).join(', ')}]` : `an array of length ${value.length}`;
  try {
    if (typeof value === 'object' && 'describe' in value && typeof (value as { describe: unknown }).describe === 'function') {
      const text = (value as { describe(): unknown }).describe();
      if (typeof text === 'string') return text;
    }
    if (typeof value === 'function') return `function ${value.name || '(anonymous)'}`;
    if (typeof value === 'symbol') return String(value);
    if (ArrayBuffer.isView(value)) return `${value.constructor.name} of length ${(value as unknown as ArrayLike<unknown>).length ?? value.byteLength}`;
    const name = (value as object).constructor?.name;
    return typeof name === 'string' && name ? name : 'object';
  } catch {
    return 'object'; // a hostile value (a throwing getter or proxy) still gets a message
  }
}
