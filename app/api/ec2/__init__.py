"""The EC2 Query API facade (``/ec2``): ``router`` serves it; ``instances``, ``keys`` and
``attributes`` register its actions."""

from app.api.ec2 import attributes as attributes
from app.api.ec2 import instances as instances
from app.api.ec2 import keys as keys
from app.api.ec2.router import router as router
