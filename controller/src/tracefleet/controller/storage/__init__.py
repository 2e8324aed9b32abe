"""Where the controller keeps its state: ``store`` (SQLite, one node) and ``etcdstore``."""
