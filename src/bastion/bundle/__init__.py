"""Model supply chain: signed, optionally encrypted, reproducible bundles verified before load."""
