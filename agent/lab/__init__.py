"""Network-namespace labs: the demo topology, its test servers, the demo itself."""
