"""Port-I/O devices of the x86 machine and the bus that routes exits to them."""
