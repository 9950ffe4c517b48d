"""The EC2 Query API facade (``/ec2``): ``router`` serves it; the modules below register its
actions, one concept each."""

from app.api.ec2 import addresses as addresses
from app.api.ec2 import attributes as attributes
from app.api.ec2 import catalogue as catalogue
from app.api.ec2 import instances as instances
from app.api.ec2 import keys as keys
from app.api.ec2 import subnets as subnets
from app.api.ec2 import tags as tags
from app.api.ec2.router import router as router
