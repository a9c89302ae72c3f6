"""Statistics on probe results: patient-level bootstrap intervals, paired comparisons of
backbones, label-efficiency sweeps and their figures."""
