"""A message between intake and delivery: what a validated SEND is
(spec.py), how a SEND is checked at intake (validate.py), and how its bytes
are built at delivery (build.py)."""
