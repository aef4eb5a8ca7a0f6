"""Test harness: real Shoal processes on loopback addresses, waited on with deadlines."""
