export { teardown as default } from "./globalTmp";
