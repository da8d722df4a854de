"""What every API view that starts an operation answers."""

from rest_framework import serializers, status
from rest_framework.response import Response

from .models import Operation


class OperationAcceptedSerializer(serializers.Serializer):
    """The answer to every request that starts long work (202)."""

    id = serializers.IntegerField()
    url = serializers.CharField()


def operation_accepted(op: Operation) -> Response:
    return Response({"id": op.pk, "url": op.api_url()}, status=status.HTTP_202_ACCEPTED)


class DisagreementSerializer(serializers.Serializer):
    migration = serializers.IntegerField()
    container = serializers.CharField()
    sentence = serializers.CharField()
    at = serializers.CharField(allow_null=True)
