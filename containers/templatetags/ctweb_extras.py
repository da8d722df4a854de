from django import template

register = template.Library()


@register.filter
def get(mapping, key):
    """`{{ d|get:"post-copy" }}`: dictionary keys that are not identifiers."""
    return (mapping or {}).get(key)


@register.simple_tag(takes_context=True)
def page_url(context, number) -> str:
    """`?...&page=N` keeping the page's filters, so paging through search results keeps them."""
    params = context["request"].GET.copy()
    params["page"] = number
    return "?" + params.urlencode()


@register.filter
def pretty_json(value) -> str:
    """An operation's result as the API shows it (indented JSON), not as a Python repr."""
    import json

    if not value:
        return ""
    return json.dumps(value, indent=2, sort_keys=False, default=str)
