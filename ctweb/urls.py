from django.contrib import admin
from django.urls import include, path
from drf_spectacular.views import SpectacularAPIView
from rest_framework.permissions import AllowAny

from containers import api as container_api
from containers import views as container_views
from core import converters  # noqa: F401  (registers <id:...>)
from core.fleet import FleetSettingsView
from core.login import LoginView, LogoutView
from hosts import api as host_api
from hosts import views as host_views

from . import views

api = [
    path("hosts/", host_api.HostList.as_view()),
    path("hosts/<str:name>/", host_api.HostDetail.as_view()),
    path("hosts/<str:name>/trust", host_api.HostTrust.as_view()),
    path("hosts/<str:name>/probe", host_api.HostProbe.as_view()),
    path("hosts/<str:name>/prepare", host_api.HostPrepare.as_view()),
    path("hosts/<str:name>/sync", container_api.HostSync.as_view()),
    path("hosts/<str:name>/evacuate", container_api.HostEvacuate.as_view()),
    path("ssh-key/", host_api.ssh_public_key),
    path("settings/", FleetSettingsView.as_view()),
    path("containers/", container_api.ContainerList.as_view()),
    path("containers/<str:name>/", container_api.ContainerDetail.as_view()),
    path("containers/<str:name>/state", container_api.ContainerState.as_view()),
    path("containers/<str:name>/migrate", container_api.ContainerMigrate.as_view()),
    path("containers/<str:name>/check", container_api.ContainerCheck.as_view()),
    path("containers/<str:name>/targets", container_api.ContainerTargets.as_view()),
    path("containers/<str:name>/snapshots/", container_api.SnapshotList.as_view()),
    path("containers/<str:name>/snapshots/compare", container_api.SnapshotCompare.as_view()),
    path("containers/<str:name>/snapshots/<str:snap>/", container_api.SnapshotDetail.as_view()),
    path("containers/<str:name>/snapshots/<str:snap>/restore", container_api.SnapshotRestore.as_view()),
    path("containers/<str:name>/snapshots/<str:snap>/export", container_api.SnapshotExport.as_view()),
    path("exports/<id:op_id>", container_api.ExportDownload.as_view()),
    path("imports", container_api.ImportList.as_view()),
    path("containers/<str:name>/schedules/", container_api.ScheduleList.as_view()),
    path("containers/<str:name>/schedules/<id:schedule_id>/", container_api.ScheduleDetail.as_view()),
    path("snapshots/", container_api.FleetSnapshots.as_view()),
    path("operations/", container_api.OperationList.as_view()),
    path("operations/<id:op_id>/", container_api.OperationDetail.as_view()),
    path("operations/<id:op_id>/cancel", container_api.OperationCancel.as_view()),
    path("operations/<id:op_id>/decide", container_api.OperationDecide.as_view()),
    path("operations/<id:op_id>/bundle", container_api.OperationBundle.as_view()),
]

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/login/", LoginView.as_view(), name="login"),
    path("accounts/logout/", LogoutView.as_view(), name="logout"),
    path("hosts/", views.host_list, name="host-list"),
    path("hosts/add/", host_views.host_add, name="host-add"),
    path("hosts/<str:name>/", views.host_detail, name="host-detail"),
    path("hosts/<str:name>/trust", host_views.host_trust, name="host-trust"),
    path("hosts/<str:name>/probe", host_views.host_probe, name="host-probe"),
    path("hosts/<str:name>/prepare", host_views.host_prepare, name="host-prepare"),
    path("hosts/<str:name>/delete", host_views.host_delete, name="host-delete"),
    path("hosts/<str:name>/sync", container_views.host_sync, name="host-sync"),
    path("hosts/<str:name>/evacuate", container_views.host_evacuate, name="host-evacuate"),
    path("containers/", container_views.container_list, name="container-list"),
    path("containers/new/", container_views.container_create, name="container-create"),
    path("containers/import/", container_views.container_import, name="container-import"),
    path("containers/<str:name>/", container_views.container_detail, name="container-detail"),
    path("containers/<str:name>/state", container_views.container_state, name="container-state"),
    path("containers/<str:name>/migrate", container_views.container_migrate, name="container-migrate"),
    path("containers/<str:name>/history/", container_views.container_timeline, name="container-timeline"),
    path("containers/<str:name>/snapshot", container_views.snapshot_create, name="snapshot-create"),
    path("containers/<str:name>/schedules/", container_views.schedule_create, name="schedule-create"),
    path(
        "containers/<str:name>/schedules/<id:schedule_id>/delete",
        container_views.schedule_delete,
        name="schedule-delete",
    ),
    path("containers/<str:name>/compare/", container_views.snapshot_compare, name="snapshot-compare"),
    path("containers/<str:name>/snapshots/<str:snap>/", container_views.snapshot_detail, name="snapshot-detail"),
    path(
        "containers/<str:name>/snapshots/<str:snap>/<str:action>",
        container_views.snapshot_action,
        name="snapshot-action",
    ),
    path("containers/<str:name>/<str:action>", container_views.container_action, name="container-action"),
    path("snapshots/", container_views.snapshot_search, name="snapshot-search"),
    path("operations/", container_views.operation_list, name="operation-list"),
    path("operations/<id:op_id>/", container_views.operation_detail, name="operation-detail"),
    path("operations/<id:op_id>/cancel", container_views.operation_cancel, name="operation-cancel"),
    path("operations/<id:op_id>/decide", container_views.operation_decide, name="operation-decide"),
    path("operations/<id:op_id>/import", container_views.export_import, name="export-import"),
    path("users/", views.user_list, name="user-list"),
    path("audit/", views.audit_log, name="audit-log"),
    path("settings/", views.fleet_settings, name="fleet-settings"),
    path("users/create", views.user_create, name="user-create"),
    path("users/<id:user_id>/update", views.user_update, name="user-update"),
    path("tokens/", views.token_list, name="token-list"),
    path("tokens/create", views.token_create, name="token-create"),
    path("tokens/<id:token_id>/revoke", views.token_revoke, name="token-revoke"),
    path("api/schema/", SpectacularAPIView.as_view(permission_classes=[AllowAny]), name="schema"),
    # Django admin's own login form would be a second, unthrottled and unaudited password
    # check: its login goes to ours (the admin site still needs a staff account).
    path("admin/login/", views.admin_login),
    path("admin/", admin.site.urls),
    path("api/v1/", include(api)),
]

# Errors outside the views (no route, a server error, a malformed request) in the API's
# format under /api/, Django's pages elsewhere.
handler400 = "ctweb.views.bad_request"
handler404 = "ctweb.views.not_found"
handler500 = "ctweb.views.server_error"
