"""`dvi serve`: the OpenAI-compatible endpoint (Ray Serve ingress, generation replicas) in front of the learning
plane that `dvi run` brings up (dvi.run.plane)."""
