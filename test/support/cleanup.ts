/** Loaded before every test file: what tempDir() made is removed when the file's tests end. */
import { removeTempDirs } from "./tempDir";

afterAll(removeTempDirs);

// Each run of the program under the mock runtime loads the Pulumi SDK afresh (jest's isolated
// module registry), and each copy of @pulumi/pulumi adds an "exit" listener to the one process
// (runtime/debuggable.ts, debuggablePromise). A file that runs the program a dozen times is not
// a leak; it would only make Node warn about one.
process.setMaxListeners(Math.max(process.getMaxListeners(), 50));
