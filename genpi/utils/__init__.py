"""Small helpers every part of genpi shares: errors, paths, constants, secret masking, Hydra resolvers and
composition helpers, metric flattening for loggers, and the entry points' task wrapper."""
