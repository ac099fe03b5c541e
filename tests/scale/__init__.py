"""Scale-out: several agent nodes sharing PostgreSQL and Redis, as real processes."""
