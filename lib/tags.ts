import { PROJECT } from "./config";

/** Tags every taggable AWS resource of a stack carries. */
export function stackTags(stack: string): Record<string, string> {
    return { Project: PROJECT, Stack: stack };
}
