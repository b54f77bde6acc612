"""Studies: many runs of one protocol, their records, and the results page rendered from them."""
