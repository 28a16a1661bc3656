"""Real servers for integration tests: a private SLURM cluster, PostgreSQL and an MLflow server.

Each is a context manager that starts daemons from the distribution's packages in a temp dir,
on loopback ports, and always stops them by PID and removes the temp dir on the way out.
"""
