"""The federation core: the server's rounds, the wire format and its validation, client sampling,
the update pipeline, client state, the client side of strategies, split prompts, secure
aggregation, the strategies and differential privacy. It never imports the task builders, the
local trainers or the run machinery above it."""
