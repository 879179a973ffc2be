"""Running Seedline pipelines on a Ray cluster: submit, follow, stop and resume jobs through Ray's Job
Submission API, safely (token auth by default), with resources checked against what the cluster has."""
