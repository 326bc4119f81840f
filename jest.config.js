/** Type checking is `tsc --noEmit`, its own step of `npm test`; jest only transpiles. */
module.exports = {
  testEnvironment: "node",
  roots: ["<rootDir>/test"],
  testMatch: ["**/*.test.ts"],
  transform: {
    "^.+\\.ts$": ["ts-jest", { diagnostics: false }],
  },
  setupFilesAfterEnv: ["<rootDir>/test/support/noSecretOutput.ts"],
  testTimeout: 60000,
};
