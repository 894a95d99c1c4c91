"""The OTA service's HTTP side: the management API (`admin.admin_app`), by resource, with the console's
static files, the job event stream and the OpenAPI document. It talks to the app layer only."""
