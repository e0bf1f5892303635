"""What `relict demo` runs: ``training`` (a Lightning DDPM watched until it copies) and ``planted`` (offline
scoring of a synthetic set with planted copies)."""
