"""replicas plugin: many router processes (on one machine or many) that own the sessions they serve."""
