"""Industrial inspection: the bundled defect benchmark, synthetic defects, segmentation and metrics."""
