"""Each action's parameters, as EC2 names them on the wire (the first segment of a flattened
name: ``Filter`` for ``Filter.1.Value.2``), from botocore 1.44.18's EC2 model.

A parameter of the action that Nephos has no use for (``SubnetId``, ``Monitoring``...) is
accepted and ignored, as ec2-api does; a name that is no parameter of the action at all is
``UnknownParameter`` (400). Regenerate after adding an action::

    .venv/bin/python -m tests.api.test_ec2_params > app/api/ec2/params.py
"""

PARAMETERS: dict[str, frozenset[str]] = {
    "AllocateAddress": frozenset(
        {
            "Address",
            "CustomerOwnedIpv4Pool",
            "Domain",
            "DryRun",
            "IpamPoolId",
            "NetworkBorderGroup",
            "PublicIpv4Pool",
            "TagSpecification",
        }
    ),
    "AssociateAddress": frozenset(
        {
            "AllocationId",
            "AllowReassociation",
            "DryRun",
            "InstanceId",
            "NetworkInterfaceId",
            "PrivateIpAddress",
            "PublicIp",
        }
    ),
    "AuthorizeSecurityGroupIngress": frozenset(
        {
            "CidrIp",
            "DryRun",
            "FromPort",
            "GroupId",
            "GroupName",
            "IpPermissions",
            "IpProtocol",
            "SourceSecurityGroupName",
            "SourceSecurityGroupOwnerId",
            "TagSpecification",
            "ToPort",
        }
    ),
    "CreateKeyPair": frozenset({"DryRun", "KeyFormat", "KeyName", "KeyType", "TagSpecification"}),
    "CreateSecurityGroup": frozenset({"DryRun", "GroupDescription", "GroupName", "TagSpecification", "VpcId"}),
    "CreateTags": frozenset({"DryRun", "ResourceId", "Tag"}),
    "DeleteKeyPair": frozenset({"DryRun", "KeyName", "KeyPairId"}),
    "DeleteSecurityGroup": frozenset({"DryRun", "GroupId", "GroupName"}),
    "DeleteTags": frozenset({"DryRun", "ResourceId", "Tag"}),
    "DescribeAddresses": frozenset({"AllocationId", "DryRun", "Filter", "PublicIp"}),
    "DescribeAvailabilityZones": frozenset({"AllAvailabilityZones", "DryRun", "Filter", "ZoneId", "ZoneName"}),
    "DescribeImages": frozenset(
        {
            "DryRun",
            "ExecutableBy",
            "Filter",
            "ImageId",
            "IncludeDeprecated",
            "IncludeDisabled",
            "MaxResults",
            "NextToken",
            "Owner",
        }
    ),
    "DescribeInstanceAttribute": frozenset({"Attribute", "DryRun", "InstanceId"}),
    "DescribeInstanceStatus": frozenset(
        {"DryRun", "Filter", "IncludeAllInstances", "IncludeManagedResources", "InstanceId", "MaxResults", "NextToken"}
    ),
    "DescribeInstanceTypes": frozenset(
        {"DryRun", "Filter", "IncludeUnsupportedInRegion", "InstanceType", "MaxResults", "NextToken"}
    ),
    "DescribeInstances": frozenset(
        {"DryRun", "Filter", "IncludeManagedResources", "InstanceId", "MaxResults", "NextToken"}
    ),
    "DescribeKeyPairs": frozenset({"DryRun", "Filter", "IncludePublicKey", "KeyName", "KeyPairId"}),
    "DescribeRegions": frozenset({"AllRegions", "DryRun", "Filter", "RegionName"}),
    "DescribeSecurityGroups": frozenset({"DryRun", "Filter", "GroupId", "GroupName", "MaxResults", "NextToken"}),
    "DescribeSubnets": frozenset({"DryRun", "Filter", "MaxResults", "NextToken", "SubnetId"}),
    "DescribeTags": frozenset({"DryRun", "Filter", "MaxResults", "NextToken"}),
    "DisassociateAddress": frozenset({"AssociationId", "DryRun", "PublicIp"}),
    "GetConsoleOutput": frozenset({"DryRun", "InstanceId", "Latest"}),
    "ImportKeyPair": frozenset({"DryRun", "KeyName", "PublicKeyMaterial", "TagSpecification"}),
    "ModifyInstanceAttribute": frozenset(
        {
            "Attribute",
            "BlockDeviceMapping",
            "DisableApiStop",
            "DisableApiTermination",
            "DryRun",
            "EbsOptimized",
            "EnaSupport",
            "EnclaveOptions",
            "GroupId",
            "InstanceId",
            "InstanceInitiatedShutdownBehavior",
            "InstanceType",
            "Kernel",
            "Ramdisk",
            "SourceDestCheck",
            "SriovNetSupport",
            "UserData",
            "Value",
        }
    ),
    "RebootInstances": frozenset({"DryRun", "InstanceId"}),
    "ReleaseAddress": frozenset({"AllocationId", "DryRun", "NetworkBorderGroup", "PublicIp"}),
    "RevokeSecurityGroupIngress": frozenset(
        {
            "CidrIp",
            "DryRun",
            "FromPort",
            "GroupId",
            "GroupName",
            "IpPermissions",
            "IpProtocol",
            "SecurityGroupRuleId",
            "SourceSecurityGroupName",
            "SourceSecurityGroupOwnerId",
            "ToPort",
        }
    ),
    "RunInstances": frozenset(
        {
            "AdditionalInfo",
            "BlockDeviceMapping",
            "CapacityReservationSpecification",
            "ClientToken",
            "CpuOptions",
            "CreditSpecification",
            "DisableApiStop",
            "DisableApiTermination",
            "DryRun",
            "EbsOptimized",
            "ElasticGpuSpecification",
            "ElasticInferenceAccelerator",
            "EnablePrimaryIpv6",
            "EnclaveOptions",
            "HibernationOptions",
            "IamInstanceProfile",
            "ImageId",
            "InstanceInitiatedShutdownBehavior",
            "InstanceMarketOptions",
            "InstanceType",
            "Ipv6Address",
            "Ipv6AddressCount",
            "KernelId",
            "KeyName",
            "LaunchTemplate",
            "LicenseSpecification",
            "MaintenanceOptions",
            "MaxCount",
            "MetadataOptions",
            "MinCount",
            "Monitoring",
            "NetworkInterface",
            "NetworkPerformanceOptions",
            "Operator",
            "Placement",
            "PrivateDnsNameOptions",
            "PrivateIpAddress",
            "RamdiskId",
            "SecondaryInterface",
            "SecurityGroup",
            "SecurityGroupId",
            "SubnetId",
            "TagSpecification",
            "UserData",
        }
    ),
    "StartInstances": frozenset({"AdditionalInfo", "DryRun", "InstanceId"}),
    "StopInstances": frozenset({"DryRun", "Force", "Hibernate", "InstanceId", "SkipOsShutdown"}),
    "TerminateInstances": frozenset({"DryRun", "Force", "InstanceId", "SkipOsShutdown"}),
}
