"""Templates and static files shared by the worker and foreman dashboards."""
