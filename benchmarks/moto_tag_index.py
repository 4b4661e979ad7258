"""moto's EC2 server with an O(1) tag lookup per resource, for fleets of thousands.

    python benchmarks/moto_tag_index.py -H 127.0.0.1 -p PORT    # as `python -m moto.server`

moto 5 finds one instance's tags by scanning every tag of every resource, once per instance in
every DescribeInstances answer (and again per tag filter), so listing N instances costs O(N²):
2.6 s for 1,000 instances, minutes for 10,000. Real EC2 pages through a fleet in seconds. This
looks the resource up in moto's own tag table instead; the answers are the same (same tags,
same order), only the time changes. The scale benchmark uses it so that 10,000 instances fit in
its time budget; `scale.py --stock-moto` runs moto as shipped.
"""

from __future__ import annotations

import sys
from collections.abc import Callable
from typing import Any


def install() -> Callable[[], None]:
    """Patch moto (in this process); returns the undo."""
    from moto.ec2.models.core import TaggedEC2Resource
    from moto.ec2.utils import EC2_PREFIX_TO_RESOURCE, get_prefix

    def get_tags(self: Any) -> list[dict[str, str]]:
        if not self.id:
            return []
        resource_type = EC2_PREFIX_TO_RESOURCE.get(get_prefix(self.id), "")
        return [
            {"resource_id": self.id, "key": key, "value": value, "resource_type": resource_type}
            for key, value in self.ec2_backend.tags.get(self.id, {}).items()
        ]

    original = TaggedEC2Resource.get_tags
    TaggedEC2Resource.get_tags = get_tags  # type: ignore[method-assign]

    def undo() -> None:
        TaggedEC2Resource.get_tags = original  # type: ignore[method-assign]

    return undo


if __name__ == "__main__":
    install()
    from moto.server import main

    main(sys.argv[1:])
