"""Flower's runtime, started and stopped for fedclinic: its processes (processes.py), the SuperLink connection and a
run's progress (runs.py), the simulation runtime (simulation.py), a local deployment (local.py) and its TLS
certificates and SuperNode keys (certs.py)."""
