from django import template

register = template.Library()


@register.filter
def get(mapping, key):
    """`{{ d|get:"post-copy" }}`: dictionary keys that are not identifiers."""
    return (mapping or {}).get(key)
