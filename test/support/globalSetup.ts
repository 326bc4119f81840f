export { setup as default } from "./globalTmp";
