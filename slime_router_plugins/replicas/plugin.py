"""replicas plugin: placeholder until the membership and ownership code lands (inert: no hooks)."""
