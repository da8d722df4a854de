from django.contrib import messages
from django.core.paginator import Paginator
from django.shortcuts import get_object_or_404, redirect, render
from django.views.decorators.http import require_POST
from rest_framework.exceptions import APIException

from ctweb.decorators import role_required

from .api import cancel_operation
from .models import Operation


@role_required("viewer")
def operation_list(request):
    qs = Operation.objects.select_related("host", "target_host", "created_by")
    status = request.GET.get("status", "")
    if status in Operation.Status.values:
        qs = qs.filter(status=status)
    page = Paginator(qs, 50).get_page(request.GET.get("page"))
    return render(
        request, "operations/list.html", {"page": page, "status": status, "statuses": Operation.Status.values}
    )


@role_required("viewer")
def operation_detail(request, op_id):
    op = get_object_or_404(Operation.objects.select_related("host", "target_host", "created_by"), pk=op_id)
    return render(request, "operations/detail.html", {"op": op})


@role_required("operator")
@require_POST
def operation_cancel(request, op_id):
    op = get_object_or_404(Operation, pk=op_id)
    try:
        cancel_operation(request, op)
    except APIException as e:
        messages.error(request, str(e.detail))
    return redirect("operation-detail", op_id=op.pk)
