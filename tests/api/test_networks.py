"""Networks and addresses through the API, on both databases: a default network on first use,
networks named by users, addresses in the server representation, no address given twice under
50 concurrent creates, exhaustion a clear 409, every address back on destroy, and drift
(an address held by a destroyed VM) found and repaired by reconciliation."""

from __future__ import annotations

import asyncio
import ipaddress
import uuid
from typing import Any

import pytest
import sqlalchemy as sa

from app.logic import addresses, reconcile, repairs
from app.models import Network, Port, Server, table_of
from tests.api.helpers import server_in
from tests.conftest import Cloud

_ports = table_of(Port)


async def _network(cloud: Cloud, user: dict[str, str], expect: int = 201, **body: Any) -> Any:
    r = await cloud.client.post("/api/v1/networks", headers=user, json=body)
    assert r.status_code == expect, r.text
    return r.json()


async def test_a_first_create_makes_the_default_network_and_shows_the_address(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "STARTED")
    [address] = vm["addresses"]
    nets = (await cloud.client.get("/api/v1/networks", headers=user)).json()["items"]
    assert [(n["name"], n["is_default"]) for n in nets] == [("default", True)]
    cidr = ipaddress.IPv4Network(nets[0]["cidr"])
    assert address["network"] == "default" and address["public_ip"] is None
    assert ipaddress.IPv4Address(address["ip"]) in cidr and address["ip"] != nets[0]["gateway"]
    assert address["mac"].startswith("52:") and len(address["mac"]) == 17
    # Another project's default network is another range.
    other = await cloud.user()
    theirs = (await server_in(cloud, other, "STARTED"))["addresses"][0]
    assert ipaddress.IPv4Address(theirs["ip"]) not in cidr
    # A listing shows the addresses too.
    listed = (await cloud.client.get("/api/v1/servers", headers=user)).json()["items"]
    assert listed[0]["addresses"] == vm["addresses"]


async def test_networks_named_by_users_and_their_refusals(cloud: Cloud) -> None:
    user = await cloud.user()
    back = await _network(cloud, user, name="back", cidr="10.20.0.0/28")
    assert back["gateway"] == "10.20.0.1" and not back["is_default"]
    pooled = await _network(cloud, user, name="front")
    assert ipaddress.IPv4Network(pooled["cidr"]).prefixlen == 24
    refused = {
        "overlap": ({"name": "x", "cidr": "10.20.0.8/29"}, 409, "InUse"),
        "taken name": ({"name": "back", "cidr": "10.30.0.0/24"}, 409, "AlreadyExists"),
        "host bits": ({"name": "y", "cidr": "10.40.0.1/24"}, 400, "BadRequest"),
        "public": ({"name": "z", "cidr": "8.8.8.0/24"}, 400, "BadRequest"),
        "too big": ({"name": "w", "cidr": "10.0.0.0/8"}, 400, "BadRequest"),
        "ipv6": ({"name": "v", "cidr": "fd00::/64"}, 400, "BadRequest"),
    }
    for what, (body, status, code) in refused.items():
        r = await cloud.client.post("/api/v1/networks", headers=user, json=body)
        assert (r.status_code, r.json()["error"]["code"]) == (status, code), what
    # A VM on two networks has two NICs, in the order asked.
    vm = await server_in(cloud, user, "STARTED", networks=["front", back["id"]])
    assert [(a["network"], a["ip"]) for a in vm["addresses"]] == [
        ("front", str(ipaddress.IPv4Network(pooled["cidr"]).network_address + 2)),
        ("back", "10.20.0.2"),
    ]
    unknown = await cloud.client.post(
        "/api/v1/servers",
        headers=user,
        json={"name": "v", "flavor": "tiny", "image": "debian-12", "networks": ["nope"]},
    )
    assert unknown.status_code == 400 and "nope" in unknown.json()["error"]["message"]
    # Another project sees none of it.
    stranger = await cloud.user()
    assert (await cloud.client.get(f"/api/v1/networks/{back['id']}", headers=stranger)).status_code == 404
    # In use: 409; once the VM is destroyed its addresses are back and the network can go.
    assert (await cloud.client.delete(f"/api/v1/networks/{back['id']}", headers=user)).status_code == 409
    job = (await cloud.act(user, vm["id"], "destroy"))["job_id"]
    assert await cloud.finish(job) == "applied"
    assert (await cloud.server(user, vm["id"]))["addresses"] == []
    assert (await cloud.client.delete(f"/api/v1/networks/{back['id']}", headers=user)).status_code == 204


async def test_fifty_concurrent_creates_in_a_small_network(cloud: Cloud) -> None:
    """A /27 has 29 addresses for VMs (the gateway takes one): 29 creates win, 21 get 409
    NetworkFull, no address is given twice, and every one comes back on destroy."""
    user = await cloud.user(vm=100, cpu=400, ram=10**7, disk=10**5)
    await _network(cloud, user, name="small", cidr="10.50.0.0/27")
    body = {"name": "n", "flavor": "tiny", "image": "debian-12", "networks": ["small"]}
    replies = await asyncio.gather(*(cloud.client.post("/api/v1/servers", headers=user, json=body) for _ in range(50)))
    codes = sorted(r.status_code for r in replies)
    assert codes == [202] * 29 + [409] * 21, codes
    assert {r.json()["error"]["code"] for r in replies if r.status_code == 409} == {"NetworkFull"}
    created = [r.json() for r in replies if r.status_code == 202]
    ips = [s["addresses"][0]["ip"] for c in created for s in c["servers"]]
    macs = [s["addresses"][0]["mac"] for c in created for s in c["servers"]]
    assert len(set(ips)) == 29 and len(set(macs)) == 29
    assert set(ips) == {str(h) for h in ipaddress.IPv4Network("10.50.0.0/27").hosts()} - {"10.50.0.1"}
    for c in created:
        assert await cloud.finish(c["job_ids"][0]) == "applied"
    jobs = [(await cloud.act(user, s["id"], "destroy"))["job_id"] for c in created for s in c["servers"]]
    await asyncio.gather(*(cloud.finish(j) for j in jobs))
    async with cloud.sessions() as s:
        assert (await s.execute(sa.select(sa.func.count()).select_from(_ports))).scalar_one() == 0
    again = await cloud.client.post("/api/v1/servers", headers=user, json=body)
    assert again.status_code == 202 and again.json()["servers"][0]["addresses"][0]["ip"] == "10.50.0.2"


async def test_concurrent_creates_on_the_default_network_never_share_an_address(cloud: Cloud) -> None:
    """The default network is read with its addresses in use in the create's first statement
    (``Allocator.for_create``): forty creates at once, after one that made the network, each get
    their own address, the lowest free ones, and an address given back is taken again."""
    user = await cloud.user(vm=100, cpu=400, ram=10**7, disk=10**5, active_cpu=400, active_ram=10**7)
    body = {"name": "d", "flavor": "tiny", "image": "debian-12"}
    first = await cloud.client.post("/api/v1/servers", headers=user, json=body)  # makes the default network
    assert first.status_code == 202, first.text
    replies = await asyncio.gather(*(cloud.client.post("/api/v1/servers", headers=user, json=body) for _ in range(40)))
    assert [r.status_code for r in replies] == [202] * 40, [r.text for r in replies if r.status_code != 202]
    made = [first.json(), *(r.json() for r in replies)]
    ips = [c["servers"][0]["addresses"][0]["ip"] for c in made]
    net = ipaddress.IPv4Network(made[0]["servers"][0]["addresses"][0]["ip"] + "/24", strict=False)
    assert len(set(ips)) == 41 and set(ips) == {str(h) for h in list(net.hosts())[1:42]}, ips
    for c in made:
        assert await cloud.finish(c["job_ids"][0]) == "applied"
    gone = made[5]["servers"][0]
    await cloud.finish((await cloud.act(user, gone["id"], "destroy"))["job_id"])
    again = await cloud.client.post("/api/v1/servers", headers=user, json=body)
    assert again.status_code == 202 and again.json()["servers"][0]["addresses"][0]["ip"] == ips[5]


async def test_an_address_held_by_a_destroyed_vm_is_drift_and_reconcile_gives_it_back(cloud: Cloud) -> None:
    user = await cloud.user()
    vm = await server_in(cloud, user, "DESTROYED")
    alive = await server_in(cloud, user, "STARTED")
    network_id = (await cloud.client.get("/api/v1/networks", headers=user)).json()["items"][0]["id"]
    async with cloud.sessions() as s:  # a bug, or a hand-edited database: the address stayed
        s.add(
            Port(
                server_id=uuid.UUID(vm["id"]), network_id=uuid.UUID(network_id), ip="10.99.0.9", mac="52:aa:aa:aa:aa:aa"
            )
        )
        await s.commit()
    async with cloud.sessions() as s:
        report = await reconcile.compare(s)
    assert report.stale_addresses == [{"server_id": vm["id"], "network": "default", "ip": "10.99.0.9"}]
    async with cloud.sessions() as s:
        done = await repairs.fix_entry(s, "stale_addresses", report.stale_addresses[0])
        await s.commit()
    assert done and "10.99.0.9" in done[0]
    async with cloud.sessions() as s:
        assert (await reconcile.compare(s)).stale_addresses == []
    assert (await cloud.server(user, alive["id"]))["addresses"] == alive["addresses"]


async def test_an_admin_sets_the_pool_networks_come_from(cloud: Cloud) -> None:
    pool = await cloud.client.get("/api/v1/admin/network-pool", headers=cloud.admin)
    assert pool.json() == {"cidr": "10.128.0.0/9", "prefix": 24}
    r = await cloud.client.put(
        "/api/v1/admin/network-pool", headers=cloud.admin, json={"cidr": "10.61.0.0/27", "prefix": 28}
    )
    assert r.status_code == 200 and r.json() == {"cidr": "10.61.0.0/27", "prefix": 28}
    made = []
    for _ in range(2):
        user = await cloud.user()
        vm = (
            await cloud.client.post(
                "/api/v1/servers", headers=user, json={"name": "a", "flavor": "small", "image": "debian-12"}
            )
        ).json()
        made.append(vm["servers"][0]["addresses"][0]["ip"])
    assert made == ["10.61.0.2", "10.61.0.18"]  # a /28 each, the gateway first
    late = await cloud.user()
    full = await cloud.client.post(
        "/api/v1/servers", headers=late, json={"name": "a", "flavor": "small", "image": "debian-12"}
    )
    assert full.status_code == 409 and full.json()["error"]["code"] == "NetworkFull"
    own = await cloud.client.post("/api/v1/networks", headers=late, json={"name": "mine", "cidr": "10.62.0.0/24"})
    assert own.status_code == 201  # a CIDR of one's own does not come from the pool
    refused = {
        "public": ({"cidr": "203.0.113.0/24", "prefix": 28}, 400),
        "wider than the range": ({"cidr": "10.61.0.0/27", "prefix": 26}, 400),
        "too small": ({"cidr": "10.61.0.0/24", "prefix": 30}, 422),
        "not a cidr": ({"cidr": "10.61.0.300/24", "prefix": 28}, 400),
    }
    for what, (body, status) in refused.items():
        r = await cloud.client.put("/api/v1/admin/network-pool", headers=cloud.admin, json=body)
        assert r.status_code == status, (what, r.text)
    r = await cloud.client.put("/api/v1/admin/network-pool", headers=late, json={"cidr": "10.70.0.0/16", "prefix": 24})
    assert r.status_code == 403
    assert (await cloud.client.get("/api/v1/admin/network-pool", headers=cloud.admin)).json()["cidr"] == "10.61.0.0/27"


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_a_claim_looks_afresh_at_an_address_once_it_holds_its_lock(cloud: Cloud) -> None:
    """PostgreSQL: what a claim asks once it holds an address's lock (``nephos_address_free``)
    sees an address committed after the claim's statement began, which the statement's own
    snapshot does not: the address another create was taking and committed between the two is
    never given again, with no second statement to find it."""
    user = await cloud.user(vm=100, cpu=400, ram=10**7, disk=10**5)
    await _network(cloud, user, name="fresh", cidr="10.62.0.0/28")
    body = {"name": "f", "flavor": "tiny", "image": "debian-12", "networks": ["fresh"]}
    async with cloud.sessions() as session:
        net = await session.scalar(sa.select(Network).where(table_of(Network).c.name == "fresh"))
        assert net is not None
        # The snapshot is taken as the statement starts; the fresh look runs after a pause,
        # during which another create commits the network's first address.
        looked = asyncio.ensure_future(
            session.execute(
                sa.text(
                    "SELECT EXISTS (SELECT 1 FROM ports WHERE network_id = :net AND ip = :ip) AS in_snapshot, "
                    "(SELECT nephos_address_free(:net, :ip) FROM pg_sleep(1.5)) AS free_now"
                ),
                {"net": net.id, "ip": "10.62.0.2"},
            )
        )
        await asyncio.sleep(0.3)
        r = await asyncio.wait_for(cloud.client.post("/api/v1/servers", headers=user, json=body), 10)
        assert r.status_code == 202, r.text
        assert r.json()["servers"][0]["addresses"][0]["ip"] == "10.62.0.2"
        assert not looked.done()  # committed while the statement ran
        in_snapshot, free_now = (await looked).one()
        assert (in_snapshot, free_now) == (False, False)
        await session.rollback()


@pytest.mark.parametrize("db_url", ["postgresql"], indirect=True)
async def test_creates_on_one_network_skip_each_others_addresses_instead_of_waiting(cloud: Cloud) -> None:
    """PostgreSQL: a create still open holds the addresses it took without holding up another
    create on the network (it takes the next ones); an address that another create committed
    between this one's read and its claim is not given again; a rolled-back create's addresses
    are free again."""
    user = await cloud.user(vm=100, cpu=400, ram=10**7, disk=10**5)
    await _network(cloud, user, name="n", cidr="10.60.0.0/28")
    body = {"name": "n", "flavor": "tiny", "image": "debian-12", "networks": ["n"]}

    async def created_ip() -> str:
        r = await asyncio.wait_for(cloud.client.post("/api/v1/servers", headers=user, json=body), 10)
        assert r.status_code == 202, r.text
        return str(r.json()["servers"][0]["addresses"][0]["ip"])

    def ips(allocator: addresses.Allocator) -> list[str]:
        return [allocator.ports(Server(name="x", project_id=uuid.uuid4()))[0].ip for _ in range(2)]

    async with cloud.sessions() as open_create:
        net = await open_create.scalar(sa.select(Network).where(table_of(Network).c.name == "n"))
        assert net is not None
        held = addresses.Allocator([net])
        await held.take(open_create, 2)
        assert ips(held) == ["10.60.0.2", "10.60.0.3"]
        assert await created_ip() == "10.60.0.4"  # at once, while the first is still open

        class Raced(addresses.Allocator):
            """Another create commits the next free address right after this one read the used."""

            raced = False

            async def _claim(self, session: Any, net: Network, count: int, postgres: bool) -> list[str]:
                if not self.raced:
                    self.raced = True
                    assert await created_ip() == "10.60.0.5"
                return await super()._claim(session, net, count, postgres)

        async with cloud.sessions() as late:
            raced = Raced([net])
            await raced.take(late, 2)
            assert ips(raced) == ["10.60.0.6", "10.60.0.7"]
        await open_create.rollback()
    assert await created_ip() == "10.60.0.2"
