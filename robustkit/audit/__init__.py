"""``robustkit audit``: the evaluation engine, certificates, sanity checks, the report and the job."""
