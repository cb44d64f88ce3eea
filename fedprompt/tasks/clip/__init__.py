"""CLIP tasks: image classification and visual question answering with prompts on a frozen
open_clip model, the frozen-feature cache, and the bundled demo CLIP."""
