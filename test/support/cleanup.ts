/** Loaded before every test file: what tempDir() made is removed when the file's tests end. */
import { removeTempDirs } from "./tempDir";

afterAll(removeTempDirs);
