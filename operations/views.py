from django.contrib import messages
from django.shortcuts import redirect
from rest_framework.exceptions import APIException


def start_or_back(request, start, back: str):
    """Start an operation and show it; if it is refused, say why on the page we came from."""
    try:
        op = start()
    except APIException as e:
        messages.error(request, str(e.detail))
        return redirect(back)
    return redirect("operation-detail", op_id=op.pk)
