// The few parts of Node that the tests use, declared here so that the package's one dev dependency stays the
// compiler (the client itself needs only the fetch API, typed by the DOM library).
declare module "node:test" {
  type Fn = () => void | Promise<void>;
  export function test(name: string, fn: Fn): Promise<void>;
  export function test(name: string, options: { skip?: boolean | string; timeout?: number }, fn: Fn): Promise<void>;
  export function before(fn: Fn): void;
  export function after(fn: Fn): void;
}

declare module "node:assert/strict" {
  interface Assert {
    (value: unknown, message?: string): asserts value;
    ok(value: unknown, message?: string): asserts value;
    equal<T>(actual: unknown, expected: T, message?: string): asserts actual is T;
    notEqual(actual: unknown, expected: unknown, message?: string): void;
    deepEqual<T>(actual: unknown, expected: T, message?: string): asserts actual is T;
    match(value: string, pattern: RegExp, message?: string): void;
    fail(message?: string): never;
    rejects(promise: Promise<unknown> | (() => Promise<unknown>), expected?: ((err: unknown) => boolean) | object, message?: string): Promise<void>;
  }
  const assert: Assert;
  export default assert;
}

declare const process: { env: Record<string, string | undefined> };
