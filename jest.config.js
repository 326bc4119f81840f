/** Type checking is `tsc --noEmit`, its own step of `npm test`; jest only transpiles. */
module.exports = {
  testEnvironment: "node",
  roots: ["<rootDir>/test"],
  testMatch: ["**/*.test.ts"],
  transform: {
    "^.+\\.ts$": ["ts-jest", { diagnostics: false }],
  },
  setupFilesAfterEnv: ["<rootDir>/test/support/noSecretOutput.ts", "<rootDir>/test/support/cleanup.ts"],
  globalSetup: "<rootDir>/test/support/globalSetup.ts",
  globalTeardown: "<rootDir>/test/support/globalTeardown.ts",
  testTimeout: 60000,
  // The integration tests mostly wait on SSH and stand-in delays, not on the CPU: three workers
  // on a 2-core machine keep both cores busy.
  maxWorkers: 3,
};
