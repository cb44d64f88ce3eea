"""A Flower app that runs a fedprompt job: the configuration is ``fedprompt.yaml`` beside this package."""
