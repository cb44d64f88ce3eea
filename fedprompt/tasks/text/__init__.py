"""Text tasks: classification with soft, deep and intrinsic prompts on a Hugging Face model loaded
in-process, or on a model behind a ``fedprompt serve`` service."""
