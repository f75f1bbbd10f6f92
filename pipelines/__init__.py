"""KFP pipelines (DAGs) and their compile/submit/schedule entry points."""
