"""Task builders: from a configuration to an ``Experiment`` (the frozen backbone, the prompt
module, the clients and their data), for text (``tasks.text``) and CLIP (``tasks.clip``) tasks,
with the pre-flight checks made from a model's configuration before its weights load."""
