"""Client-level differential privacy of the prompt updates: the plan and accountant
(:mod:`~fedprompt.federation.privacy.accounting`), DP-FedAvg on a trusted server
(:mod:`~fedprompt.federation.privacy.central`), noise added on each client
(:mod:`~fedprompt.federation.privacy.local`), and what a run's ``privacy`` section plugs into a
round (:mod:`~fedprompt.federation.privacy.stages`)."""
