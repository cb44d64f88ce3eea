"""The checks of one configuration section against another, run on every ``RunConfig`` after its
sections are each valid, one module per concern: ``rounds`` (who takes part), ``privacy`` (what the
server may see of each update), ``local_training`` (strategies against optimisers, black-box
search), ``task_parts`` (backbone, prompt, head and data). ``cross_section`` runs them in order.
"""
