"""Server-side aggregation strategies: one module per rule (a pure function of the client
updates), their configuration classes in ``config`` and the table that builds them in ``registry``."""
