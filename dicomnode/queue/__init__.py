"""From stored instances to classification jobs: series completeness, the durable job queue, workers."""
