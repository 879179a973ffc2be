-- The basic-auth app keeps users and permissions in a database of its own (its migrations would clash
-- with the tracking store's in one database).
CREATE DATABASE mlflow_auth OWNER mlflow;
