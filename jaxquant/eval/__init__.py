"""jaxquant.eval: measurement (rate-distortion against the Shannon bound; more to come)."""
